//! What a node selector shows: a model's servers ranked by Performance
//! Score with every component, the auto-selected set, how the selection
//! covers the model's blocks, how each server is reached, and the route
//! through the selection. `sherpa nodes` prints it; the dashboard serves
//! it as JSON.

use serde_json::{json, Value};
use swarm_core::{BlockRange, ModelId};
use swarm_dht::{Reach, Survey};
use swarm_score::{
    plan, select, Candidate, Overrides, RankedCandidate, Route, RouteOptions, Selection,
    SelectionPolicy, Status,
};

use crate::SherpaError;

/// One model's servers, the selection over them and the route through it.
#[derive(Debug, Clone)]
pub struct ModelReport {
    /// The model.
    pub model: ModelId,
    /// Its servers as surveyed.
    pub survey: Survey,
    /// The user's pins and exclusions the selection honoured.
    pub overrides: Overrides,
    /// The auto-selection; `None` when no server is listed (the block
    /// count is then unknown).
    pub selection: Option<Selection>,
    /// The selected candidates and the route through them, when the
    /// selection covers the model.
    pub route: Option<(Vec<Candidate>, Route)>,
}

impl ModelReport {
    /// Selects over `survey` with `policy` and `overrides`, and plans the
    /// route through the selection.
    pub fn new(
        model: ModelId,
        survey: Survey,
        policy: &SelectionPolicy,
        overrides: Overrides,
    ) -> Result<Self, SherpaError> {
        let blocks = survey.model_blocks();
        let selection = if blocks > 0 {
            Some(select(&survey.candidates, blocks, policy, &overrides)?)
        } else {
            None
        };
        let route = selection.as_ref().and_then(|sel| {
            let chosen: Vec<Candidate> = sel
                .selected
                .iter()
                .map(|&i| survey.candidates[i].clone())
                .collect();
            let span = BlockRange::new(0, blocks).ok()?;
            plan(&chosen, span, &RouteOptions::default(), &Default::default())
                .ok()
                .map(|route| (chosen, route))
        });
        Ok(Self {
            model,
            survey,
            overrides,
            selection,
            route,
        })
    }

    /// The model's block count, as most servers report it (0 when none).
    pub fn blocks(&self) -> u32 {
        self.survey.model_blocks()
    }

    /// Rows in rank order: (rank, candidate index, score and status).
    pub fn rows(&self) -> Vec<(usize, usize, Option<&RankedCandidate>)> {
        match &self.selection {
            Some(sel) => sel
                .ranked
                .iter()
                .enumerate()
                .map(|(rank, r)| (rank + 1, r.index, Some(r)))
                .collect(),
            None => (0..self.survey.candidates.len())
                .map(|i| (i + 1, i, None))
                .collect(),
        }
    }

    /// Per block: whether a selected server hosts it, and how many
    /// listed servers do.
    pub fn coverage(&self) -> Vec<BlockCover> {
        let selected: Vec<usize> = self
            .selection
            .as_ref()
            .map(|s| s.selected.clone())
            .unwrap_or_default();
        (0..self.blocks())
            .map(|block| {
                let hosts: Vec<usize> = (0..self.survey.candidates.len())
                    .filter(|&i| self.survey.candidates[i].blocks.contains(block))
                    .collect();
                let state = if hosts.iter().any(|i| selected.contains(i)) {
                    CoverState::Selected
                } else if hosts.is_empty() {
                    CoverState::Missing
                } else {
                    CoverState::Elsewhere
                };
                BlockCover {
                    block,
                    state,
                    hosts: hosts.len(),
                }
            })
            .collect()
    }

    /// Everything as JSON (the layout `sherpa nodes --json` prints and the
    /// dashboard serves).
    pub fn json(&self) -> Value {
        let candidates = &self.survey.candidates;
        let servers: Vec<Value> = self
            .rows()
            .into_iter()
            .map(|(rank, i, ranked)| {
                let s = &self.survey.listing.servers[i];
                let c = &candidates[i];
                let info = &s.info;
                let reach = self.survey.reach.get(&s.peer_id);
                let mut entry = json!({
                    "rank": rank,
                    "peer_id": s.peer_id.to_string(),
                    "name": info.public_name,
                    "summary": c.summary(),
                    "model": info.model.as_str(),
                    "blocks": range(&info.blocks),
                    "throughput": info.throughput,
                    "cache_tokens_free": info.cache_tokens_free,
                    "sessions": info.sessions,
                    "upload_bps": c.upload_bps,
                    "download_bps": c.download_bps,
                    "reported_upload_bps": info.upload_bps,
                    "reported_download_bps": info.download_bps,
                    "hardware": info.hardware.describe(),
                    "gpu": info.hardware.gpu.is_some(),
                    "memory_free": info.hardware.memory_free(),
                    "cpu_cores": info.hardware.cpu_cores,
                    "software_version": info.software_version,
                    "expires_at_ms": info.expires_at_ms,
                    "ping_ms": c.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    "pinned": self.overrides.pinned.contains(&c.id),
                    "excluded": self.overrides.excluded.contains(&c.id),
                    "reachability": {
                        "path": reach.map_or("unknown", Reach::path),
                        "error": match reach {
                            Some(Reach::Unreachable(e)) => Some(e.as_str()),
                            _ => None,
                        },
                        "hint": reach.and_then(Reach::hint),
                    },
                });
                if let Some(r) = ranked {
                    let p = &r.score.components;
                    entry["score"] = json!({
                        "total": r.score.total,
                        "ping": p.ping, "upload": p.upload, "download": p.download,
                        "memory": p.memory, "compute": p.compute,
                    });
                    entry["status"] = status_name(r.status).into();
                    entry["selected"] = r.status.is_selected().into();
                }
                entry
            })
            .collect();
        let peer = |i: usize| self.survey.listing.servers[i].peer_id.to_string();
        let selection = self.selection.as_ref().map(|sel| {
            json!({
                "selected": sel.selected.iter().map(|&i| peer(i)).collect::<Vec<_>>(),
                "uncovered": sel.uncovered.iter().map(range).collect::<Vec<_>>(),
                "min_replicas": sel.min_replicas,
                "over_limit": sel.over_limit,
                "notes": sel.notes,
            })
        });
        let route = self.route.as_ref().map(|(chosen, route)| {
            json!({
                "est_secs_per_token": route.cost_secs,
                "hops": route.hops.iter().map(|h| json!({
                    "name": chosen[h.index].name,
                    "peer_id": self.survey.peer_of(&chosen[h.index].id).map(|p| p.to_string()),
                    "blocks": range(&h.blocks),
                    "est_secs": h.cost_secs,
                })).collect::<Vec<_>>(),
            })
        });
        let cells = self.coverage();
        let missing = not_selected(&cells);
        let named = |ids: &std::collections::HashSet<swarm_score::ServerId>| -> Vec<String> {
            ids.iter()
                .filter_map(|id| self.survey.peer_of(id))
                .map(|p| p.to_string())
                .collect()
        };
        let l = &self.survey.listing;
        json!({
            "model": self.model.as_str(),
            "model_blocks": self.blocks(),
            "servers": servers,
            "selection": selection,
            "coverage": {
                "covered": !cells.is_empty() && missing.is_empty(),
                "cells": cells.iter().map(|c| json!({
                    "block": c.block, "state": c.state.name(), "hosts": c.hosts,
                })).collect::<Vec<_>>(),
                "missing": missing.iter().map(range).collect::<Vec<_>>(),
            },
            "route": route,
            "pinned": named(&self.overrides.pinned),
            "excluded": named(&self.overrides.excluded),
            "rejected_records": l.rejected,
            "expired_records": l.expired,
            "missing_records": l.missing,
            "skipped_servers": l.mismatched.iter().map(|m| json!({
                "peer_id": m.server.peer_id.to_string(),
                "name": m.server.info.public_name,
                "blocks": range(&m.server.info.blocks),
                "reason": m.reason,
            })).collect::<Vec<_>>(),
        })
    }
}

/// How one block is covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCover {
    /// The block.
    pub block: u32,
    /// Whether the selection, another server or nobody hosts it.
    pub state: CoverState,
    /// Listed servers hosting it.
    pub hosts: usize,
}

/// Who hosts a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoverState {
    /// A selected server.
    Selected,
    /// Only servers outside the selection.
    Elsewhere,
    /// No listed server.
    Missing,
}

impl CoverState {
    /// `selected`, `elsewhere` or `missing`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Selected => "selected",
            Self::Elsewhere => "elsewhere",
            Self::Missing => "missing",
        }
    }
}

/// The runs of blocks no selected server hosts.
fn not_selected(cells: &[BlockCover]) -> Vec<BlockRange> {
    let mut runs = Vec::new();
    let mut start = None;
    for cell in cells {
        match (cell.state == CoverState::Selected, start) {
            (false, None) => start = Some(cell.block),
            (true, Some(s)) => {
                runs.extend(BlockRange::new(s, cell.block).ok());
                start = None;
            }
            _ => {}
        }
    }
    if let (Some(s), Some(last)) = (start, cells.last()) {
        runs.extend(BlockRange::new(s, last.block + 1).ok());
    }
    runs
}

/// A status as the selector shows it.
pub fn status_name(status: Status) -> &'static str {
    match status {
        Status::Pinned => "pinned",
        Status::Coverage => "selected",
        Status::Redundancy => "replica",
        Status::Excluded => "excluded",
        Status::NotSelected => "-",
        Status::Unusable => "unusable",
    }
}

fn range(r: &BlockRange) -> Value {
    json!({"start": r.start(), "end": r.end()})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(states: &[CoverState]) -> Vec<BlockCover> {
        states
            .iter()
            .enumerate()
            .map(|(i, &state)| BlockCover {
                block: i as u32,
                state,
                hosts: 1,
            })
            .collect()
    }

    #[test]
    fn the_blocks_outside_the_selection_come_out_as_runs() {
        use CoverState::*;
        let runs = not_selected(&cells(&[Selected, Missing, Elsewhere, Selected, Missing]));
        let shown: Vec<String> = runs.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["1..3", "4..5"]);
        assert!(not_selected(&cells(&[Selected, Selected])).is_empty());
    }
}

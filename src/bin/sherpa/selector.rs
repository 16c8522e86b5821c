//! What `sherpa nodes` shows: the ranked servers with their score
//! components, the auto-selected set, and the route through it.

use sherpa_swarm::core::ModelId;
use sherpa_swarm::dht::ServerListing;
use sherpa_swarm::score::{Candidate, Route, Selection, Status};

/// Everything `sherpa nodes` found and decided.
pub(crate) struct NodesView<'a> {
    pub model: &'a ModelId,
    pub blocks: u32,
    pub listing: &'a ServerListing,
    /// One per listed server, same order.
    pub candidates: &'a [Candidate],
    pub selection: Option<&'a Selection>,
    /// The selected candidates and the route through them.
    pub route: Option<(&'a [Candidate], &'a Route)>,
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Pinned => "pinned",
        Status::Coverage => "selected",
        Status::Redundancy => "replica",
        Status::Excluded => "excluded",
        Status::NotSelected => "-",
        Status::Unusable => "unusable",
    }
}

fn mbps(bps: u64) -> f64 {
    bps as f64 * 8.0 / 1e6
}

impl NodesView<'_> {
    /// Rows in rank order: (rank, server index, score and status).
    fn rows(&self) -> Vec<(usize, usize, Option<&sherpa_swarm::score::RankedCandidate>)> {
        match self.selection {
            Some(sel) => sel
                .ranked
                .iter()
                .enumerate()
                .map(|(rank, r)| (rank + 1, r.index, Some(r)))
                .collect(),
            None => (0..self.candidates.len())
                .map(|i| (i + 1, i, None))
                .collect(),
        }
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        let servers: Vec<serde_json::Value> = self
            .rows()
            .into_iter()
            .map(|(rank, i, ranked)| {
                let s = &self.listing.servers[i];
                let c = &self.candidates[i];
                let info = &s.info;
                let mut entry = serde_json::json!({
                    "rank": rank,
                    "peer_id": s.peer_id.to_string(),
                    "name": info.public_name,
                    "summary": c.summary(),
                    "model": info.model.as_str(),
                    "blocks": {"start": info.blocks.start(), "end": info.blocks.end()},
                    "throughput": info.throughput,
                    "cache_tokens_free": info.cache_tokens_free,
                    "sessions": info.sessions,
                    "upload_bps": c.upload_bps,
                    "download_bps": c.download_bps,
                    "reported_upload_bps": info.upload_bps,
                    "reported_download_bps": info.download_bps,
                    "hardware": info.hardware.describe(),
                    "memory_free": info.hardware.memory_free(),
                    "cpu_cores": info.hardware.cpu_cores,
                    "software_version": info.software_version,
                    "expires_at_ms": info.expires_at_ms,
                    "ping_ms": c.rtt.map(|d| d.as_secs_f64() * 1000.0),
                });
                if let Some(r) = ranked {
                    let p = &r.score.components;
                    entry["score"] = serde_json::json!({
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
        let range = |r: &sherpa_swarm::core::BlockRange| serde_json::json!({"start": r.start(), "end": r.end()});
        let selection = self.selection.map(|sel| {
            serde_json::json!({
                "selected": sel.selected.iter().map(|&i| self.listing.servers[i].peer_id.to_string()).collect::<Vec<_>>(),
                "uncovered": sel.uncovered.iter().map(range).collect::<Vec<_>>(),
                "min_replicas": sel.min_replicas,
                "over_limit": sel.over_limit,
                "notes": sel.notes,
            })
        });
        let route = self.route.map(|(chosen, route)| {
            serde_json::json!({
                "est_secs_per_token": route.cost_secs,
                "hops": route.hops.iter().map(|h| serde_json::json!({
                    "name": chosen[h.index].name,
                    "blocks": range(&h.blocks),
                    "est_secs": h.cost_secs,
                })).collect::<Vec<_>>(),
            })
        });
        serde_json::json!({
            "model": self.model.as_str(),
            "model_blocks": self.blocks,
            "servers": servers,
            "selection": selection,
            "route": route,
            "rejected_records": self.listing.rejected,
            "expired_records": self.listing.expired,
            "missing_records": self.listing.missing,
        })
    }

    pub(crate) fn print(&self) {
        println!(
            "{} servers of {} ({} blocks)",
            self.candidates.len(),
            self.model,
            self.blocks
        );
        if !self.candidates.is_empty() {
            println!(
                "  {:>3}  {:<16} {:<8} {:>5}  {:>8} {:>7} {:>7} {:>6} {:>7}  {:<9} hardware",
                "#", "name", "blocks", "score", "ping", "up", "down", "memory", "compute", "status",
            );
        }
        for (rank, i, ranked) in self.rows() {
            let c = &self.candidates[i];
            let ping = c.rtt.map_or("-".to_string(), |d| {
                format!("{:.1}ms", d.as_secs_f64() * 1000.0)
            });
            let (total, parts, status) = match ranked {
                Some(r) => (
                    format!("{:.1}", r.score.total),
                    r.score.components,
                    status_name(r.status),
                ),
                None => ("-".into(), Default::default(), "-"),
            };
            println!(
                "  {rank:>3}  {:<16} {:<8} {total:>5}  {ping:>8} {:>5.0}Mb {:>5.0}Mb {:>5.0}G {:>7.2}  {status:<9} {}  (ping {:.2} up {:.2} down {:.2} mem {:.2})",
                c.name,
                c.blocks.to_string(),
                mbps(c.upload_bps),
                mbps(c.download_bps),
                c.hardware.memory_free() as f64 / 1e9,
                parts.compute,
                c.hardware.describe(),
                parts.ping,
                parts.upload,
                parts.download,
                parts.memory,
            );
        }
        if let Some(sel) = self.selection {
            let names: Vec<&str> = sel
                .selected
                .iter()
                .map(|&i| self.candidates[i].name.as_str())
                .collect();
            println!(
                "selected {} of {}: {} (every coverable block has at least {} host{})",
                names.len(),
                self.candidates.len(),
                names.join(", "),
                sel.min_replicas,
                if sel.min_replicas == 1 { "" } else { "s" }
            );
            for note in &sel.notes {
                println!("  note: {note}");
            }
        }
        if let Some((chosen, route)) = self.route {
            let hops: Vec<String> = route
                .hops
                .iter()
                .map(|h| format!("{} {}", chosen[h.index].name, h.blocks))
                .collect();
            println!(
                "route: {}  (est. {:.1} ms per token)",
                hops.join(" -> "),
                route.cost_secs * 1000.0
            );
        }
        let l = self.listing;
        if l.rejected + l.expired > 0 {
            println!(
                "  (dropped {} invalid and {} expired records)",
                l.rejected, l.expired
            );
        }
    }
}

//! What `sherpa nodes` prints: the ranked servers with their score
//! components, the auto-selected set, and the route through it (the
//! library's [`ModelReport`], which also gives the JSON).

use sherpa_swarm::nodes::{status_name, ModelReport};

fn mbps(bps: u64) -> f64 {
    bps as f64 * 8.0 / 1e6
}

pub(crate) fn print(report: &ModelReport) {
    let candidates = &report.survey.candidates;
    println!(
        "{} servers of {} ({} blocks)",
        candidates.len(),
        report.model,
        report.blocks()
    );
    if !candidates.is_empty() {
        println!(
            "  {:>3}  {:<16} {:<8} {:>5}  {:>8} {:>7} {:>7} {:>6} {:>7}  {:<9} hardware",
            "#", "name", "blocks", "score", "ping", "up", "down", "memory", "compute", "status",
        );
    }
    for (rank, i, ranked) in report.rows() {
        let c = &candidates[i];
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
    if let Some(sel) = report.selection.as_ref() {
        let names: Vec<&str> = sel
            .selected
            .iter()
            .map(|&i| candidates[i].name.as_str())
            .collect();
        println!(
            "selected {} of {}: {} (every coverable block has at least {} host{})",
            names.len(),
            candidates.len(),
            names.join(", "),
            sel.min_replicas,
            if sel.min_replicas == 1 { "" } else { "s" }
        );
        for note in &sel.notes {
            println!("  note: {note}");
        }
    }
    if let Some((chosen, route)) = report.route.as_ref() {
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
    let l = &report.survey.listing;
    for m in &l.mismatched {
        println!(
            "  skipped {} ({}): {}",
            m.server.info.public_name, m.server.info.blocks, m.reason
        );
    }
    if l.rejected + l.expired > 0 {
        println!(
            "  (dropped {} invalid and {} expired records)",
            l.rejected, l.expired
        );
    }
}

//! Choosing nodes by hand: a loopback swarm with two replicas of each half
//! of the model; the client shows every server's Performance Score, then
//! excludes one server and pins another, and generates through the result.
//!
//! `cargo run --release --example custom_selection`

use sherpa_swarm::{Client, GenerateOptions, Server, Tracker};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tracker = Tracker::builder().start().await?;
    let mut servers = Vec::new();
    for (name, blocks) in [
        ("north-1", "0..15"),
        ("north-2", "0..15"),
        ("south-1", "15..30"),
        ("south-2", "15..30"),
    ] {
        servers.push(
            Server::builder("smollm2-135m", blocks.parse()?)
                .name(name)
                .tracker(tracker.addr().clone())
                .start()
                .await?,
        );
    }
    let client = Client::builder("smollm2-135m")
        .tracker(tracker.addr().clone())
        .exclude("north-1")
        .pin("south-2")
        .max_nodes(2)
        .start()
        .await?;
    let plan = client.plan().await?;
    for ranked in &plan.selection.ranked {
        let candidate = &plan.survey.candidates[ranked.index];
        println!(
            "{:>5.1}  {}  {:?}",
            ranked.score.total,
            candidate.summary(),
            ranked.status
        );
    }
    let out = client
        .generate_text(
            "Name three rivers.",
            &GenerateOptions::default(),
            &mut |_| true,
        )
        .await?;
    for hop in &out.route {
        println!("route: {hop}");
    }
    client.shutdown().await;
    for server in servers {
        server.shutdown().await?;
    }
    tracker.shutdown().await;
    Ok(())
}

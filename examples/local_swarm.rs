//! A whole swarm in one process on loopback: a tracker, three servers
//! splitting the default model's 30 blocks, and a client generating
//! through them. The same builders run each part on its own machine.
//!
//! `cargo run --release --example local_swarm -- "Your prompt"`

use std::io::Write;

use sherpa_swarm::{Client, GenerateOptions, Server, Tracker};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Name three rivers.".to_owned());
    let tracker = Tracker::builder().start().await?;
    let mut servers = Vec::new();
    for blocks in ["0..10", "10..20", "20..30"] {
        let server = Server::builder("smollm2-135m", blocks.parse()?)
            .tracker(tracker.addr().clone())
            .start()
            .await?;
        println!("server {} hosts blocks {blocks}", server.info().public_name);
        servers.push(server);
    }
    let client = Client::builder("smollm2-135m")
        .tracker(tracker.addr().clone())
        .start()
        .await?;
    let out = client
        .generate_text(&prompt, &GenerateOptions::default(), &mut |piece| {
            print!("{piece}");
            std::io::stdout().flush().is_ok()
        })
        .await?;
    println!();
    for hop in &out.route {
        println!("route: {hop}");
    }
    println!("{:.1} tokens/s", out.output.decode_tokens_per_second());
    client.shutdown().await;
    for server in servers {
        server.shutdown().await?;
    }
    tracker.shutdown().await;
    Ok(())
}
